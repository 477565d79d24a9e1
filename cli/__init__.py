"""The command-line apps: one module per `run.py` stage, and the model/tokenizer/adapters loader they share."""
