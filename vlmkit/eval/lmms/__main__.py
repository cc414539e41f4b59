"""`python -m vlmkit.eval.lmms ARGS`: lmms-eval's command line with the `vlmkit` model entry registered."""

import os
import sys

PLUGIN = "vlmkit.eval.lmms"


def main() -> None:
    plugins = [p for p in os.environ.get("LMMS_EVAL_PLUGINS", "").split(",") if p]
    if PLUGIN not in plugins:
        os.environ["LMMS_EVAL_PLUGINS"] = ",".join([*plugins, PLUGIN])
    from importlib.metadata import entry_points

    scripts = [e for e in entry_points(group="console_scripts") if e.name == "lmms-eval"]
    if not scripts:
        sys.exit(
            "lmms-eval is not installed: pip install --no-deps lmms-eval, then the few packages it imports "
            "(see the README's Evaluate section); its own requirements would replace this torch"
        )
    scripts[0].load()()  # the installed lmms-eval's own command line


if __name__ == "__main__":
    main()
