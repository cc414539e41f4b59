"""Where lmms-eval looks for a plugin's own task definitions (it requires the package). vlmkit ships none:
lmms-eval's tasks, or yours through `--include_path DIR`, run as they are."""
