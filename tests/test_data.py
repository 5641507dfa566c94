"""Loaders for the shared/data layouts, label maps, length-grouped batching and padding."""

from collections import Counter

import pytest
import torch

from carlrar.data import (Collator, EncodedSplit, LengthGroupedBatchSampler, Split, label_map_from, load_files,
                          load_named, subset)
from carlrar.errors import UserError
from conftest import SHARED_DATA

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


@needs_shared
def test_sst2_glue_counts_labels_and_stripped_text():
    ds = load_named("sst2", str(SHARED_DATA))
    assert ds.label_names == ["negative", "positive"]
    assert len(ds.splits["train"]) == 67349 and len(ds.splits["dev"]) == 872
    assert Counter(ds.splits["train"].labels) == {0: 29780, 1: 37569}
    assert Counter(ds.splits["dev"].labels) == {0: 428, 1: 444}
    assert not any(t != t.strip() for t in ds.splits["train"].texts)  # GLUE's trailing spaces are gone
    assert "test" not in ds.splits and "sst2_glue/test.tsv" in ds.unlabelled["test"]  # GLUE test has no labels


@needs_shared
def test_agnews_one_based_labels_and_title_plus_description():
    ds = load_named("agnews", str(SHARED_DATA))
    assert ds.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert len(ds.splits["train"]) == 17995 and len(ds.splits["dev"]) == 2000
    assert Counter(ds.splits["dev"].labels) == {0: 500, 1: 500, 2: 500, 3: 500}
    # first dev row: "2","Air Force Footballer Acquitted of Steroids (AP)","AP - For the second time ..."
    assert ds.splits["dev"].labels[0] == 1
    assert ds.splits["dev"].texts[0].startswith("Air Force Footballer Acquitted of Steroids (AP) AP - For the second")


@needs_shared
def test_yelp_newlines_unescaped_labels_shifted_and_dev_carved():
    ds = load_named("yelp-p", str(SHARED_DATA))
    assert ds.label_names == ["negative", "positive"]
    assert len(ds.splits["train"]) + len(ds.splits["dev"]) == 200 and len(ds.splits["dev"]) == 20
    assert len(ds.splits["test"]) == 20 and Counter(ds.splits["test"].labels) == {0: 12, 1: 8}
    assert not any("\\n" in t for t in ds.splits["train"].texts)
    train_and_dev = Counter(ds.splits["train"].labels) + Counter(ds.splits["dev"].labels)
    assert train_and_dev == {0: 131, 1: 69}


@needs_shared
def test_yahoo_topic_names_as_labels():
    ds = load_named("yahoo", str(SHARED_DATA))
    assert ds.label_names == ["science_mathematics", "society_culture"]
    assert len(ds.splits["test"]) == 418
    assert Counter(ds.splits["train"].labels) + Counter(ds.splits["dev"].labels) == {0: 2000, 1: 2000}


def test_label_map_sorts_ids_numerically_and_names_alphabetically():
    assert label_map_from(["10", "2", "1", "2"]) == (["1", "2", "10"], {"1": 0, "2": 1, "10": 2})
    assert label_map_from(["pos", "neg"]) == (["neg", "pos"], {"neg": 0, "pos": 1})


def test_generic_jsonl_with_names(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"review": "good", "y": "pos"}\n{"review": "bad", "y": "neg"}\n\n{"review": "fine", "y": "pos"}\n')
    d = tmp_path / "d.jsonl"
    d.write_text('{"review": "meh", "y": "neg"}\n')
    ds = load_files(str(f), str(d), text_column="review", label_column="y")
    assert ds.label_names == ["neg", "pos"]
    assert ds.splits["train"].texts == ["good", "bad", "fine"] and ds.splits["train"].labels == [1, 0, 1]
    assert ds.splits["dev"].labels == [0]


def test_split_for_model_renumbers_to_the_model_label_order(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    ds = load_files(str(f), str(f))
    assert ds.split("dev").labels == [1, 0]  # dataset order: neg, pos
    assert ds.split_for_model("dev", ["pos", "neg", "mixed"]).labels == [0, 1]
    with pytest.raises(UserError, match="labels the model does not know: neg"):
        ds.split_for_model("dev", ["pos"])


def test_subset_is_seeded_and_sized():
    split = Split([f"t{i}" for i in range(100)], [i % 2 for i in range(100)], "x")
    a, b, c = subset(split, 10, 0), subset(split, 10, 0), subset(split, 10, 1)
    assert len(a) == 10 and a.texts == b.texts and a.texts != c.texts
    assert subset(split, None, 0) is split


def test_length_grouped_batches_cover_every_index_once_and_cut_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (2000,), generator=g).tolist()
    grouped = LengthGroupedBatchSampler(lengths, 32, seed=1)
    plain = LengthGroupedBatchSampler(lengths, 32, seed=1, group_by_length=False)
    for sampler in (grouped, plain):
        seen = [i for b in sampler for i in b]
        assert sorted(seen) == list(range(2000)) and len(list(sampler)) == len(sampler) == 63

    def padded(sampler):
        return sum(max(lengths[i] for i in b) * len(b) for b in sampler)

    assert padded(grouped) < 0.6 * padded(plain)  # random lengths 3..59: grouping removes most padding
    assert list(grouped) == list(LengthGroupedBatchSampler(lengths, 32, seed=1))  # deterministic
    grouped.set_epoch(1)
    assert list(grouped) != list(LengthGroupedBatchSampler(lengths, 32, seed=1))  # reshuffled per epoch


def test_sampler_resume_offset_and_process_slices():
    lengths = list(range(1, 101))
    full = list(LengthGroupedBatchSampler(lengths, 8, seed=3))
    late = LengthGroupedBatchSampler(lengths, 8, seed=3)
    late.start = 5
    assert list(late) == full[5:]
    ranks = [list(LengthGroupedBatchSampler(lengths, 8, seed=3, rank=r, num_replicas=2)) for r in (0, 1)]
    for b, b0, b1 in zip(full, *ranks):
        assert sorted(b0 + b1) == sorted(b) and len(b0) >= len(b1)


def test_collator_pads_dynamically_and_keeps_index(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = EncodedSplit(Split(["a b c d e", "a"], [1, 0], "x"), tok, max_length=4)
    assert enc.lengths == [4, 3]  # [CLS] a [SEP] ; truncated to 4
    batch = Collator(tok.pad_token_id)([enc[1], enc[0]])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["input_ids"][0, 3].item() == tok.pad_token_id
    assert batch["index"].tolist() == [1, 0] and batch["labels"].tolist() == [0, 1]


def test_hub_fallback_draws_seeded_per_class_subsets(monkeypatch, tmp_path):
    import datasets

    import carlrar.data as data

    def fake_hub(*args):
        assert args == ("ag_news",)
        names = datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])
        feats = datasets.Features({"text": datasets.Value("string"), "label": names})
        make = lambda n: datasets.Dataset.from_dict(  # noqa: E731
            {"text": [f"t{i}\\nx" for i in range(n)], "label": [i % 4 for i in range(n)]}, features=feats)
        return datasets.DatasetDict({"train": make(80), "test": make(40)})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.setitem(data.HUB_SUBSETS, "agnews", (5, 2, 3))
    ds = load_named("agnews", str(tmp_path))  # tmp_path has no ag_news/ folder → hub
    assert ds.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert [Counter(ds.splits[s].labels) for s in ("train", "dev", "test")] == [
        {c: 5 for c in range(4)}, {c: 2 for c in range(4)}, {c: 3 for c in range(4)}]
    assert not set(ds.splits["train"].texts) & set(ds.splits["dev"].texts)  # dev drawn apart from train
    assert all("\\n" not in t for t in ds.splits["train"].texts)
    again = load_named("agnews", str(tmp_path))
    assert again.splits["train"].texts == ds.splits["train"].texts  # fixed seed


def test_sampler_never_leaves_a_process_without_rows():
    from carlrar.data import LengthGroupedBatchSampler

    lengths = list(range(9))  # 9 = 4 + 4 + 1: the tail of 1 would leave one of two processes empty
    slices = [list(LengthGroupedBatchSampler(lengths, 4, seed=0, rank=r, num_replicas=2)) for r in (0, 1)]
    assert len(slices[0]) == len(slices[1]) == len(LengthGroupedBatchSampler(lengths, 4, num_replicas=2)) == 2
    assert all(s for per_rank in slices for s in per_rank)
    assert sorted(i for per_rank in slices for s in per_rank for i in s) == lengths  # every example once
    assert len(LengthGroupedBatchSampler(lengths, 4)) == 3  # one process keeps the tail as its own batch
