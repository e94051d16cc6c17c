"""Search drivers. Engines (Optuna, NNI) are imported from their own modules where used."""
