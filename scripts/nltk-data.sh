#!/usr/bin/env bash
# NLTK data for TextAttack's word-level recipes, offline: WordNet 3.0 from Debian's packages and the classic
# English stopword list. nltk.download() needs the internet; apt repositories are reachable where pip is.
#   usage: scripts/nltk-data.sh [DIR]   (default ${CARLRAR_NLTK_DATA:-$HOME/.cache/carlrar/nltk_data})
set -euo pipefail
out=${1:-${CARLRAR_NLTK_DATA:-$HOME/.cache/carlrar/nltk_data}}
wordnet=$out/corpora/wordnet
if [ -f "$wordnet/lexnames" ] && [ -f "$out/corpora/stopwords/english" ]; then
  echo "NLTK data already in $out"; exit 0
fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
  || { echo "error: needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch WordNet offline" >&2; exit 2; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# download only (no system install, no root needed for the unpacking): the database and its sense index
(cd "$work" && apt-get download -q wordnet-base wordnet-sense-index >/dev/null)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
mkdir -p "$wordnet" "$out/corpora/stopwords"
cp "$work"/x/usr/share/wordnet/* "$wordnet/"
# Debian ships no lexnames file, which nltk's WordNet reader opens first: rebuild it from the lexnames(5WN) man
# page's table (number, name, syntactic category 1 noun, 2 verb, 3 adjective, 4 adverb).
zcat "$work"/x/usr/share/man/man5/lexnames.5WN.gz \
  | awk -F'\t' '/^[0-9][0-9]\t/ { name=$2; gsub(/ +$/, "", name); split(name, p, ".");
                                    cat = p[1]=="noun" ? 1 : p[1]=="verb" ? 2 : p[1]=="adj" ? 3 : 4;
                                    printf "%s\t%s\t%d\n", $1, name, cat }' > "$wordnet/lexnames"
[ "$(wc -l < "$wordnet/lexnames")" -eq 45 ] || { echo "error: lexnames has not 45 lines" >&2; exit 1; }
# NLTK's classic 179-word English stopword list (stopwords corpus before 2024)
tr ' ' '\n' > "$out/corpora/stopwords/english" <<'WORDS'
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this that that'll these those am is are was were be been being have has had having do does did doing a an the and but if or because as until while of at by for with about against between into through during before after above below to from up down in out on off over under again further then once here there when where why how all any both each few more most other some such no nor not only own same so than too very s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
WORDS
[ "$(wc -l < "$out/corpora/stopwords/english")" -eq 179 ] || { echo "error: stopword list has not 179 words" >&2; exit 1; }
echo "WordNet 3.0 and English stopwords written to $out"
