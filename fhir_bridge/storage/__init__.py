"""Storage: SQLAlchemy models, the engine, and Alembic migrations."""

from fhir_bridge.storage.database import Database, make_engine
from fhir_bridge.storage.models import Base, utcnow

__all__ = ["Base", "Database", "make_engine", "utcnow"]
