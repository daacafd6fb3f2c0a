"""agent/common"""
