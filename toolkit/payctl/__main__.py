"""``python -m payctl``: the same entry point as the ``payctl`` script (used where PATH may lack the venv's bin)."""

from payctl.cli import main

main()
