"""Fast detectors fitted on normal data; they emit candidates with evidence, never verdicts."""
