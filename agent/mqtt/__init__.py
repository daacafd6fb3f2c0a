"""agent/mqtt"""
