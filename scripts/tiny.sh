#!/usr/bin/env bash
# Rebuild the embedded default from scratch: data, tokenizer, pre-trained base, and the bundled SFT adapters.
# About 30 minutes on a 2-core CPU (most of it the pre-training). Run from the repository root: bash scripts/tiny.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m data.tiny_tasks --out bundled/data                              # deterministic task generator
python scripts/make_tiny.py tokenizer --data bundled/data --out bundled      # sentencepiece, Gemma special ids
python scripts/make_tiny.py pretrain --data bundled/data --out bundled --steps 1500 --batch 32   # ~2.3M-param Gemma 2, ~20-25 min
rm -rf runs/sft-default
python run.py --stage sft --out runs/sft-default                          # the default SFT run
rm -rf bundled/sft_adapters && cp -r runs/sft-default/adapters bundled/sft_adapters
