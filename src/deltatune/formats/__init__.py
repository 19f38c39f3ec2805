"""Adapter file formats (Hugging Face PEFT's is the one deltatune reads and writes)."""
