"""The toy world: a synthetic pretraining corpus and a teacher-written domain set with contradictions,
small enough to pretrain and fine-tune on a laptop CPU in minutes (``make demo``)."""
