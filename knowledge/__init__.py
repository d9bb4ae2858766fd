"""Process documents, runbooks, past cases and anomaly rules (Chroma store). Built in the explainer issue."""
