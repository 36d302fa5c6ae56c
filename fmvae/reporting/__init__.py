"""Tables, figures, the judge of generated properties, committed runs and named DVC experiments (no training code
depends on them: a change here re-keys no checkpoint)."""
