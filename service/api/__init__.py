"""HTTP controllers: thin; they parse, authorize and delegate to the services."""
