"""(stub)"""
