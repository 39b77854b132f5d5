"""The two-tower model: a PyTorch port of Phoenix's retrieval towers."""

from shared.model.config import TowerConfig
from shared.model.towers import CandidateTower, TwoTowerModel, UserTower

__all__ = ["CandidateTower", "TowerConfig", "TwoTowerModel", "UserTower"]
