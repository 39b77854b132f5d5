"""Python client of the two-tower serving stack (a thin class over the generated stubs)."""

from shared.client.library import HistoryEvent, RetrievedItem, RetrieveResult, TwoTowerClient

__all__ = ["HistoryEvent", "RetrieveResult", "RetrievedItem", "TwoTowerClient"]
