"""user_service: online user-tower encoding (`UserTower.EncodeUsers`) with dynamic micro-batching."""
