"""Evaluation on public labelled data and benchmarks; takes the data directory as an argument."""
