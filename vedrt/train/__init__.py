"""Training and evaluation of captioners (`vedrt train`, `vedrt eval`)."""
