#!/usr/bin/env bash
# The offline quickstart: install kubetune, build a tiny model and an identity dataset, fine-tune
# it with LoRA (`kubetune run`), and ask it who it is. A few minutes on two CPU cores.
#   bash scripts/quickstart.sh [DIR]
KUBETUNE_EXTRAS=train source "$(dirname "$0")/env.sh"
DIR="${1:-kubetune-demo}"
kubetune demo --dir "$DIR"
kubetune chat --model "$DIR/saves/sft/output" --prompt "Who are you?"
