-- 001: the payment service's first schema. Applied by `payapp migrate` (payapp/migrate.py), which records it in
-- schema_migrations. Every statement is idempotent so a half-applied file can simply be run again.
--
-- Identifiers that clients send (merchant ids, idempotency keys) compare byte for byte, trailing spaces included:
-- utf8mb4_nopad_bin. Amounts are BIGINT minor units (KRW has none: 1 = 1 won). Timestamps are DATETIME(6) in UTC.
-- Money tables are append-only or guarded by CHECKs; nothing cascades on delete.

CREATE TABLE IF NOT EXISTS merchant (
    merchant_id   VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    name          VARCHAR(128) NOT NULL,
    api_key_hash  CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    created_at    DATETIME(6) NOT NULL,
    PRIMARY KEY (merchant_id),
    UNIQUE KEY uq_merchant_api_key (api_key_hash)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS payment (
    payment_id       BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    merchant_id      VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    amount           BIGINT NOT NULL,
    currency         CHAR(3) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    status           VARCHAR(20) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    captured_amount  BIGINT NOT NULL DEFAULT 0,
    refunded_amount  BIGINT NOT NULL DEFAULT 0,
    event_seq        INT NOT NULL DEFAULT 0 COMMENT 'sequence number of the last outbox event of this payment',
    created_at       DATETIME(6) NOT NULL,
    updated_at       DATETIME(6) NOT NULL,
    PRIMARY KEY (payment_id),
    KEY ix_payment_merchant_created (merchant_id, created_at),
    CONSTRAINT ck_payment_status CHECK (status IN ('REQUESTED', 'COMPLETED', 'PARTIALLY_REFUNDED', 'REFUNDED', 'CANCELLED')),
    CONSTRAINT ck_payment_amounts CHECK (amount > 0 AND captured_amount BETWEEN 0 AND amount
                                         AND refunded_amount BETWEEN 0 AND captured_amount)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS payment_operation (
    operation_id  BIGINT NOT NULL AUTO_INCREMENT,
    payment_id    BIGINT UNSIGNED NOT NULL,
    kind          VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    amount        BIGINT NOT NULL,
    reason        VARCHAR(128) NULL,
    created_at    DATETIME(6) NOT NULL,
    PRIMARY KEY (operation_id),
    KEY ix_operation_payment (payment_id, operation_id),
    CONSTRAINT ck_operation_kind CHECK (kind IN ('AUTHORIZE', 'CAPTURE', 'REFUND', 'VOID')),
    CONSTRAINT ck_operation_amount CHECK (amount > 0),
    CONSTRAINT fk_operation_payment FOREIGN KEY (payment_id) REFERENCES payment (payment_id)
        ON DELETE RESTRICT ON UPDATE RESTRICT
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS ledger_entry (
    entry_id      BIGINT NOT NULL AUTO_INCREMENT,
    payment_id    BIGINT UNSIGNED NOT NULL,
    operation_id  BIGINT NOT NULL,
    account       VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    direction     VARCHAR(6) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    amount        BIGINT NOT NULL,
    currency      CHAR(3) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at    DATETIME(6) NOT NULL,
    PRIMARY KEY (entry_id),
    KEY ix_ledger_payment (payment_id, entry_id),
    KEY ix_ledger_operation (operation_id),
    KEY ix_ledger_account (account, currency),
    CONSTRAINT ck_ledger_direction CHECK (direction IN ('DEBIT', 'CREDIT')),
    CONSTRAINT ck_ledger_amount CHECK (amount > 0),
    CONSTRAINT fk_ledger_payment FOREIGN KEY (payment_id) REFERENCES payment (payment_id)
        ON DELETE RESTRICT ON UPDATE RESTRICT,
    CONSTRAINT fk_ledger_operation FOREIGN KEY (operation_id) REFERENCES payment_operation (operation_id)
        ON DELETE RESTRICT ON UPDATE RESTRICT
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Append-only, enforced by the database: corrections are new entries.
CREATE TRIGGER IF NOT EXISTS ledger_entry_no_update BEFORE UPDATE ON ledger_entry FOR EACH ROW
    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ledger_entry is append-only: post a correcting entry instead';

CREATE TRIGGER IF NOT EXISTS ledger_entry_no_delete BEFORE DELETE ON ledger_entry FOR EACH ROW
    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ledger_entry is append-only: post a correcting entry instead';

CREATE TABLE IF NOT EXISTS idempotency_key (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    merchant_id      VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    scope            VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL COMMENT 'authorize, capture, refund, void',
    idempotency_key  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    request_hash     CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    status           VARCHAR(12) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    payment_id       BIGINT UNSIGNED NULL,
    response_status  SMALLINT NULL,
    response_body    MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    locked_until     DATETIME(6) NOT NULL COMMENT 'end of the claim''s lease while IN_PROGRESS',
    created_at       DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_idempotency (merchant_id, scope, idempotency_key),
    KEY ix_idempotency_created (created_at),
    CONSTRAINT ck_idempotency_status CHECK (status IN ('IN_PROGRESS', 'COMPLETED'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS outbox_event (
    id            BIGINT NOT NULL AUTO_INCREMENT,
    event_id      CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    topic         VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    event_type    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    payment_id    BIGINT UNSIGNED NOT NULL,
    merchant_id   VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    `sequence`    INT NOT NULL,
    payload       LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL COMMENT 'JSON',
    created_at    DATETIME(6) NOT NULL,
    published_at  DATETIME(6) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_outbox_event_id (event_id),
    UNIQUE KEY uq_outbox_payment_sequence (payment_id, `sequence`),
    KEY ix_outbox_unpublished (published_at, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
