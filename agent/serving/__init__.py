"""agent/serving"""
