"""Model execution, apart from HTTP: nothing in this package imports FastAPI or knows about requests' JSON."""
