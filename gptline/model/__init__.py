"""The model (gpt.py), KV-cache sampling (generate.py) and the Hugging Face export (export.py)."""
