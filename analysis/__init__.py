"""analysis: readouts of the SCORE core and of trained models (toy demo, theorem checks, figures, reports)."""
