"""The lmms-eval model entry `vlmkit`: any vlmkit model, batched through the continuous-batching engine, on
any lmms-eval task that generates text.

    LMMS_EVAL_PLUGINS=vlmkit.eval.lmms lmms-eval --model vlmkit --model_args pretrained=demo --tasks pope \\
        --batch_size 16
    python -m vlmkit.eval.lmms --model vlmkit --model_args pretrained=demo ...   # the same, plugin set

lmms-eval reads plugins from `LMMS_EVAL_PLUGINS` (a package whose `models` module lists its entries in
`AVAILABLE_MODELS`); `python -m vlmkit.eval.lmms` sets it and runs lmms-eval's own command line.
"""
