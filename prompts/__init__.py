"""Versioned Jinja2 prompt templates and the verdict JSON schema. Built in the explainer issue."""
