"""Training: the options (`options`), the data (`data`, `formats`), setting a run up (`setup_run`), the
loop (`trainer`) and what it reports about itself (`progress`), checkpoints and the run folder
(`checkpoint`, `rundir`), several processes (`distributed`), and watching a run live (`watch`)."""
