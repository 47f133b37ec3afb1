-- 003: sequences from which each worker reserves blocks of payment and operation ids (payapp/ids.py), so that
-- authorize knows its ids before it sends its one-round-trip transaction. NEXTVAL is not transactional and
-- NOCACHE makes every reservation durable: a block is never handed out twice, even across a crash.
CREATE SEQUENCE IF NOT EXISTS payment_id_block START WITH 1 INCREMENT BY 1 MINVALUE 1 NOCACHE NOCYCLE;
CREATE SEQUENCE IF NOT EXISTS operation_id_block START WITH 1 INCREMENT BY 1 MINVALUE 1 NOCACHE NOCYCLE;
