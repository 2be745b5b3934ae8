"""Integrations of transkd_fast's ops into other libraries (``hf``: Hugging Face transformers)."""
