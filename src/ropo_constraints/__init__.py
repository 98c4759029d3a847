"""ROPO on a real model: preference pairs from an instruct model's own samples, ranked by a
programmatic gold reward (verifiable instruction-following constraints). Beside the ropo library,
which never imports it; docs/real_model.md describes the run."""
