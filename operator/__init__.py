"""kubetune.operator: the kopf operator that reconciles FineTuneJobs into Jobs and status."""
