"""The explainer agent and the analyst surfaces (CLI now; chat, API, reports later)."""
