#!/usr/bin/env bash
# Here, before a GPU session (no GPU needed): build everything the device tool carries, in git-ignored folders.
#   bash scripts/gpu/pack.sh             # all of it (every stage of session.sh)
#   bash scripts/gpu/pack.sh validate    # only what scripts/gpu/validate.sh needs: .whl/, .whl-eval/, the tokenizer,
#                                        # the corpus
# .whl/                      wheels the GPU image lacks (deepspeed, omegaconf, ...; scripts/gpu/wheels.py)
# .whl-eval/                 ... and lm-eval with its needs (carried only by calls that evaluate)
# .carry/data/study/         the study corpus (scripts/build_study_corpus.py: Debian packages; the device gets the
#                            repo only and reaches no package server), 12 shards, ~7.5 MiB
# .carry/data/tokenizers/    the 32k LLaMA-style tokenizer (scripts/fetch_study_tokenizer.py: the mistral-common wheel)
# .carry/eval_data.tar.gz    the paper's benchmarks as local lm-eval tasks (scripts/fetch_eval_data.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
exclude=.git/info/exclude
mkdir -p "$(dirname $exclude)"
for d in /.whl/ /.whl-eval/ /.carry/; do grep -qxF "$d" $exclude 2>/dev/null || echo "$d" >> $exclude; done
if [ "${1:-}" = validate ]; then
  $PY scripts/gpu/wheels.py --eval  # .whl-eval: lm-eval, for the eval stage's stock side (issue #25)
  $PY scripts/fetch_study_tokenizer.py --out .carry/data/tokenizers
  $PY scripts/build_study_corpus.py --out .carry/data/study
  du -sh .whl .whl-eval .carry/data/tokenizers .carry/data/study | sed 's/^/carry: /'
  exit 0
fi
$PY scripts/gpu/wheels.py --eval
$PY scripts/fetch_study_tokenizer.py --out .carry/data/tokenizers
$PY scripts/build_study_corpus.py --out .carry/data/study
if [ ! -f .carry/eval_data.tar.gz ]; then
  tmp=$(mktemp -d)
  $PY scripts/fetch_eval_data.py --out "$tmp/eval_data"
  tar -czf .carry/eval_data.tar.gz -C "$tmp" eval_data
  rm -rf "$tmp"
fi
du -sh .whl .whl-eval .carry/data/study .carry/data/tokenizers .carry/eval_data.tar.gz | sed 's/^/carry: /'
