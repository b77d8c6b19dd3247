"""Relationship tests reuse the delivery fixtures: sekmet with SMART Backend Services, workers."""

from tests.integration.delivery.conftest import ehr_reader, make_services, smart_ehr

__all__ = ["ehr_reader", "make_services", "smart_ehr"]
