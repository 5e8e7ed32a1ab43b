"""Drift detection (issue 13): river's ADWIN over what each served version answers, per task.
Pure: :mod:`streamtune.drift.watch` sees plain arrays; the scorer feeds it and exports what it
finds (``streamtune_drift_detected_total``)."""
