"""Fleet updates: signed bundles (bundle.py, keys.py), a board's two model
slots and the update between them (board.py), the golden prompts a model
must answer before a board trusts it (golden.py), and the commands."""
