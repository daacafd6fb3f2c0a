"""agent/system"""
