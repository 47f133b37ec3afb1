-- 004: the hourly reconciliation (payapp/reconcile.py) reads one hour of payment_operation and ledger_entry by
-- created_at; without these indexes each run scans both tables whole, and they grow by every payment, forever.
-- created_at only grows, so each insert appends at the right edge of the index. Online (INPLACE, LOCK=NONE):
-- payments keep flowing while an existing table is indexed.
ALTER TABLE payment_operation ADD INDEX IF NOT EXISTS ix_operation_created (created_at), ALGORITHM=INPLACE, LOCK=NONE;
ALTER TABLE ledger_entry ADD INDEX IF NOT EXISTS ix_ledger_created (created_at), ALGORITHM=INPLACE, LOCK=NONE;
