"""Analysis: scoring a model on text (`evaluate`), watching it change (`snapshots`), comparing two
checkpoints (`compare`) and reporting it as text, JSON, PNG (`report`) and HTML (`htmlreport`)."""
