"""Worker side of graders: model graders run a local alignd model (see service/graders for the rest)."""
