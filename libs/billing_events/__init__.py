"""Contracts shared by every service: message models, topic names, money and units, time, ids."""
