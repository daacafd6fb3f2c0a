"""agent/protocol"""
