"""Training: the options (`options`), the data (`data`, `formats`), a grown vocabulary (`vocab`),
setting a run up (`setup_run`), the loop (`trainer`) and what it reports about itself (`progress`),
checkpoints and writing the run folder (`checkpoint`, `rundir`), several processes (`distributed`),
and watching a run live (`watch`)."""
