"""kubetune.runtime: the FineTuneJob spec, the plan, data, models, stages, storage and the CLI."""
