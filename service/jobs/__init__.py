"""Job specs, job lifecycle and the rules for creating jobs."""
