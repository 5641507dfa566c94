"""Datasets → labelled examples with a stable index (``reading``), tokenised once and batched by length
(``batching``). Everything is importable from ``carlrar.data``."""

from carlrar.data.batching import Collator, EncodedSplit, LengthGroupedBatchSampler, eval_batches
from carlrar.data.reading import (DATASETS, HUB_SUBSETS, SPLITS, DatasetSpec, Split, TextDataset, carve_dev,
                                  carve_validation,
                                  encode_labels, label_map_from, load_dataset, load_files, load_named,
                                  read_examples, read_labelled_file, read_table, read_texts, subset)

__all__ = ["DATASETS", "HUB_SUBSETS", "SPLITS", "Collator", "DatasetSpec", "EncodedSplit", "LengthGroupedBatchSampler",
           "Split", "TextDataset", "carve_dev", "carve_validation", "encode_labels", "eval_batches", "label_map_from", "load_dataset",
           "load_files", "load_named", "read_examples", "read_labelled_file", "read_table", "read_texts", "subset"]
