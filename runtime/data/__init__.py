"""Datasets: loading files and sources, converting formats, chat templates, tokenization."""
