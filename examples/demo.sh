#!/usr/bin/env bash
# What `make demo` runs: the built-in demo models (trained by `make demo-models` on the shapes world) answer
# questions about hand-made pictures, with visual prompts drawn on them by `--visual-prompt`.
set -euo pipefail
VLMKIT=${VLMKIT:-.venv/bin/vlmkit}
EX=vlmkit/demo/examples

ask() {
    local shown=""
    for a in "$@"; do  # the command as one would type it
        if [[ "$a" =~ ^[A-Za-z0-9_./:=-]+$ ]]; then shown+=" $a"; else shown+=" '$a'"; fi
    done
    echo
    echo "\$ vlmkit generate$shown"
    printf "Q: %s\nA: " "${*: -1}"
    "$VLMKIT" generate "$@"
}

ask --image $EX/scene1.png --visual-prompt '{"type": "rectangle", "box": [106, 106, 182, 182], "color": "red"}' \
    "What shape is inside the red rectangle?"
ask --image $EX/scene2.png --visual-prompt '{"type": "arrow", "points": [[144, 144], [215, 215]], "color": "lime"}' \
    "What color is the shape the arrow points to?"
ask --image $EX/scene2.png "Describe the image."
ask --model demo-idefics --image $EX/scene2.png --image $EX/scene4.png \
    "Which image has a square, the first or the second?"
