//! Multi-row statements in each database's best form, for every batch the store writes or
//! reads (imports, audit entries, the dispatcher's rounds). On PostgreSQL a batch is one
//! statement whose columns are bound as arrays (`UNNEST`): its text never changes with the
//! number of rows, so the server parses and plans it once per connection, and a batch of any
//! size costs a handful of bind parameters. On SQLite it is a multi-row `VALUES` (or `IN`)
//! list, cut into pieces under the bind-parameter limit.

use std::borrow::Cow;

use sqlx::QueryBuilder;

use super::events::{FEED_CHANNEL, FEED_LOCK};

/// Bind parameters per statement at most: SQLite's default limit (32766).
const SQLITE_MAX_BINDS: usize = 32_766;

/// One column of a batch of rows; every column of a batch has one value per row. Text is
/// borrowed from the rows where it can be: it is copied once, into the statement's binds.
#[derive(Debug, Clone)]
pub enum Column<'a> {
    Text(Vec<Cow<'a, str>>),
    NullableText(Vec<Option<Cow<'a, str>>>),
    BigInt(Vec<i64>),
    Int(Vec<i32>),
    Bool(Vec<bool>),
    Bytes(Vec<Vec<u8>>),
    NullableBytes(Vec<Option<Vec<u8>>>),
}

impl<'a> Column<'a> {
    /// The column with its text owned.
    pub fn into_owned(self) -> Column<'static> {
        let own = |v: Cow<'_, str>| Cow::Owned(v.into_owned());
        match self {
            Self::Text(v) => Column::Text(v.into_iter().map(own).collect()),
            Self::NullableText(v) => {
                Column::NullableText(v.into_iter().map(|v| v.map(own)).collect())
            }
            Self::BigInt(v) => Column::BigInt(v),
            Self::Int(v) => Column::Int(v),
            Self::Bool(v) => Column::Bool(v),
            Self::Bytes(v) => Column::Bytes(v),
            Self::NullableBytes(v) => Column::NullableBytes(v),
        }
    }

    /// A text column of owned values.
    pub fn owned_text(values: Vec<String>) -> Self {
        Self::Text(values.into_iter().map(Cow::Owned).collect())
    }

    fn len(&self) -> usize {
        match self {
            Self::Text(v) => v.len(),
            Self::NullableText(v) => v.len(),
            Self::BigInt(v) => v.len(),
            Self::Int(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::Bytes(v) => v.len(),
            Self::NullableBytes(v) => v.len(),
        }
    }

    /// PostgreSQL's array type for the column.
    fn pg_array(&self) -> &'static str {
        match self {
            Self::Text(_) | Self::NullableText(_) => "text[]",
            Self::BigInt(_) => "int8[]",
            Self::Int(_) => "int4[]",
            Self::Bool(_) => "bool[]",
            Self::Bytes(_) | Self::NullableBytes(_) => "bytea[]",
        }
    }

    /// About how many bytes the column takes bound as a PostgreSQL array: the array's header,
    /// then each value's length and bytes.
    fn pg_bound_size(&self) -> usize {
        const HEADER: usize = 4 + 20;
        let each = |fixed: usize| HEADER + self.len() * (4 + fixed);
        match self {
            Self::Text(v) => HEADER + v.iter().map(|s| 4 + s.len()).sum::<usize>(),
            Self::NullableText(v) => {
                HEADER
                    + v.iter()
                        .map(|s| 4 + s.as_ref().map_or(0, |s| s.len()))
                        .sum::<usize>()
            }
            Self::BigInt(_) => each(8),
            Self::Int(_) => each(4),
            Self::Bool(_) => each(1),
            Self::Bytes(v) => HEADER + v.iter().map(|b| 4 + b.len()).sum::<usize>(),
            Self::NullableBytes(v) => {
                HEADER
                    + v.iter()
                        .map(|b| 4 + b.as_ref().map_or(0, Vec::len))
                        .sum::<usize>()
            }
        }
    }

    fn into_values(self) -> Vec<Value<'a>> {
        match self {
            Self::Text(v) => v.into_iter().map(Value::Text).collect(),
            Self::NullableText(v) => v.into_iter().map(Value::NullableText).collect(),
            Self::BigInt(v) => v.into_iter().map(Value::BigInt).collect(),
            Self::Int(v) => v.into_iter().map(Value::Int).collect(),
            Self::Bool(v) => v.into_iter().map(Value::Bool).collect(),
            Self::Bytes(v) => v.into_iter().map(Value::Bytes).collect(),
            Self::NullableBytes(v) => v.into_iter().map(Value::NullableBytes).collect(),
        }
    }
}

/// One value of a [`Column`], for databases that bind row by row.
enum Value<'a> {
    Text(Cow<'a, str>),
    NullableText(Option<Cow<'a, str>>),
    BigInt(i64),
    Int(i32),
    Bool(bool),
    Bytes(Vec<u8>),
    NullableBytes(Option<Vec<u8>>),
}

/// One multi-row insert: `head` names the table and columns (`INSERT INTO t (a, b)`), `tail`
/// follows the rows (`ON CONFLICT ..`).
pub struct Insert<'a> {
    pub head: &'static str,
    pub columns: Vec<Column<'a>>,
    pub tail: &'static str,
}

impl Insert<'_> {
    /// The insert with its text owned, to outlive the rows it was made of.
    pub fn into_owned(self) -> Insert<'static> {
        Insert {
            head: self.head,
            columns: self.columns.into_iter().map(Column::into_owned).collect(),
            tail: self.tail,
        }
    }

    fn is_empty(&self) -> bool {
        rows_of(&self.columns) == 0
    }
}

/// Rows a whole insert locks before it writes, as a `WITH` clause named `name`: for each of
/// `values`, in their order, the rows `head = value tail` (`head` ends with an indexed
/// column, `tail` is a lock clause), as [`BatchSql::select_each`] reads them. The inserts
/// join to it by name, so that a row whose stored counterpart is missing is not written.
pub struct Locked<'a> {
    pub name: &'a str,
    pub head: &'a str,
    pub values: Vec<String>,
    pub tail: &'a str,
}

/// A lookup by a unique key: for each of `values`, the `value` column of the `table` row
/// whose `key` column equals it, if there is one.
pub struct Lookup<'a> {
    pub table: &'a str,
    pub key: &'a str,
    pub value: &'a str,
    pub values: Vec<String>,
}

/// The statements a batch of rows takes on one database.
pub trait BatchSql: sqlx::Database + Sized {
    /// Whether the statements' text is fixed, so the database may keep them prepared.
    const PREPARED: bool;
    /// Whether [`BatchSql::insert_whole`] makes a statement (rows given); where it does not, a
    /// caller need not build what it would write.
    const WHOLE: bool;

    /// Inserts the rows `columns` hold. `head` names the table and columns
    /// (`INSERT INTO t (a, b)`); `tail` follows the rows (`ON CONFLICT .. RETURNING ..`).
    /// Returns no statement for no rows.
    fn insert(
        head: &'static str,
        columns: Vec<Column<'_>>,
        tail: &'static str,
    ) -> Vec<QueryBuilder<Self>>;

    /// `head v tail`, with the rows `columns` hold as a table `v(column1, column2, ..)`, for
    /// statements that join a batch to stored rows (`UPDATE t SET .. FROM v WHERE ..`).
    /// No statement for no rows.
    fn table(head: &str, columns: Vec<Column<'_>>, tail: &str) -> Vec<QueryBuilder<Self>>;

    /// Selects rows whose column is one of `values`: `head` ends with the column
    /// (`SELECT a FROM t WHERE b`), `tail` follows the condition. No statement for no values.
    fn matching(head: &str, values: Vec<String>, tail: &str) -> Vec<QueryBuilder<Self>>;

    /// As [`BatchSql::matching`] for a select, one lookup per value where the database
    /// allows: on PostgreSQL each value is joined to its rows through the column's index
    /// (`CROSS JOIN LATERAL`), a plan that stays right however large the table grows after it
    /// was prepared, and `tail` (a lock clause) applies to each lookup, taken in the order of
    /// `values`.
    fn select_each(head: &str, values: Vec<String>, tail: &str) -> Vec<QueryBuilder<Self>>;

    /// Several inserts, in order, as few statements as the database allows: on PostgreSQL
    /// one (every insert but the last a `WITH` clause), so the batch costs one round trip.
    /// Inserts with no rows are left out.
    fn insert_all(inserts: Vec<Insert<'_>>) -> Vec<QueryBuilder<Self>>;

    /// `insert`, returning its `returning` column, and `lookup`, in one statement where the
    /// database allows. Every row the statements give has three text columns: `part`
    /// (`inserted` or `found`), `a` (the returned value, or the key found) and `b` (the
    /// value found; NULL for inserted rows). The lookup does not see the insert's rows.
    fn insert_and_lookup(
        insert: Insert<'_>,
        returning: &str,
        lookup: Lookup<'_>,
    ) -> Vec<QueryBuilder<Self>>;

    /// The inserts as one statement that stores either every row or nothing: it fails with
    /// [`NOT_WRITTEN_WHOLE`] unless each insert stored exactly its number of rows (an insert
    /// whose tail filters its rows may store fewer), or on a key of [`NOT_NEW`]. `feed`, the
    /// insert of the change's feed events, is taken last in the database's sense: under the
    /// feed's lock (`store::events`), with a notification of the feed's channel. Run on its
    /// own (not in a transaction), the statement is its own transaction: the batch costs one
    /// round trip.
    /// `None` where the database cannot do this in one statement, or when there is no row to
    /// insert (`feed` alone is a statement: the last of a transaction that writes events).
    fn insert_whole(inserts: Vec<Insert<'_>>, feed: Insert<'_>) -> Option<QueryBuilder<Self>> {
        Self::insert_whole_locking(None, inserts, feed)
    }

    /// As [`BatchSql::insert_whole`], the statement first locking the rows of `locked`, which
    /// its inserts may read (`JOIN name ..` in their tails).
    fn insert_whole_locking(
        locked: Option<Locked<'_>>,
        inserts: Vec<Insert<'_>>,
        feed: Insert<'_>,
    ) -> Option<QueryBuilder<Self>>;
}

/// The SQLSTATE of a statement from [`BatchSql::insert_whole`] that did not store every row.
pub const NOT_WRITTEN_WHOLE: &str = "PB001";

/// The keys whose unique violation means a row of a statement from
/// [`BatchSql::insert_whole`] was not new: its request id used before, its registration
/// number taken, or a claim filed before for its partner. Such a statement stored nothing,
/// as one failing with [`NOT_WRITTEN_WHOLE`]. (Its inserts are plain: `ON CONFLICT .. DO
/// NOTHING` would cost each row PostgreSQL's speculative insertion, for a case the step by
/// step path answers anyway.)
pub const NOT_NEW: [&str; 3] = [
    "idempotency_pkey",
    "partners_business_registration_number_key",
    "claims_partner_id_key",
];

/// Whether `e` says a row of a statement from [`BatchSql::insert_whole`] was not new
/// (see [`NOT_NEW`]): the statement stored nothing, and the batch is written step by step.
pub fn not_written_whole(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.code().as_deref() == Some(NOT_WRITTEN_WHOLE)
        || (e.is_unique_violation() && e.constraint().is_some_and(|c| NOT_NEW.contains(&c)))
}

fn rows_of(columns: &[Column<'_>]) -> usize {
    let rows = columns.first().map_or(0, Column::len);
    debug_assert!(columns.iter().all(|c| c.len() == rows), "ragged batch");
    rows
}

/// A statement builder starting with `init`, its text and bind buffer sized up front for the
/// columns of `inserts` (and `extra` more bytes of either), so that binding a batch's arrays
/// does not grow them copy after copy.
fn sized_builder<'a>(
    init: &str,
    inserts: impl IntoIterator<Item = &'a Insert<'a>>,
    extra: usize,
) -> QueryBuilder<sqlx::Postgres> {
    use sqlx::Arguments as _;
    let (mut binds, mut bytes, mut text) = (0, extra, init.len() + extra);
    for insert in inserts {
        binds += insert.columns.len();
        bytes += insert
            .columns
            .iter()
            .map(Column::pg_bound_size)
            .sum::<usize>();
        // The insert's own words, then `$n::type[]` for each column.
        text += insert.head.len() + insert.tail.len() + 64 + 16 * insert.columns.len();
    }
    let mut arguments = sqlx::postgres::PgArguments::default();
    arguments.reserve(binds, bytes);
    let mut sql = String::with_capacity(text);
    sql.push_str(init);
    QueryBuilder::with_arguments(sql, arguments)
}

/// Appends `INSERT .. SELECT * FROM UNNEST($1::type[], ..) tail` to `qb`.
fn push_unnest_insert(qb: &mut QueryBuilder<sqlx::Postgres>, insert: Insert<'_>) {
    qb.push(insert.head).push(" SELECT * FROM ");
    push_unnest(qb, insert.columns);
    qb.push(insert.tail);
}

/// Appends `UNNEST($1::type[], ..)`, one array per column, to `qb`.
fn push_unnest(qb: &mut QueryBuilder<sqlx::Postgres>, columns: Vec<Column<'_>>) {
    qb.push("UNNEST(");
    for (i, column) in columns.into_iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        let array = column.pg_array();
        match column {
            Column::Text(v) => qb.push_bind(v),
            Column::NullableText(v) => qb.push_bind(v),
            Column::BigInt(v) => qb.push_bind(v),
            Column::Int(v) => qb.push_bind(v),
            Column::Bool(v) => qb.push_bind(v),
            Column::Bytes(v) => qb.push_bind(v),
            Column::NullableBytes(v) => qb.push_bind(v),
        };
        qb.push("::").push(array);
    }
    qb.push(")");
}

/// The rows of `columns` as `VALUES` lists, one statement `before rows after` per piece under
/// the bind-parameter limit. No statement for no rows.
fn sqlite_values(
    before: &str,
    columns: Vec<Column<'_>>,
    after: &str,
) -> Vec<QueryBuilder<sqlx::Sqlite>> {
    let rows = rows_of(&columns);
    if rows == 0 || columns.is_empty() {
        return Vec::new();
    }
    let per_statement = (SQLITE_MAX_BINDS / columns.len()).max(1);
    let mut values: Vec<std::vec::IntoIter<Value>> = columns
        .into_iter()
        .map(|c| c.into_values().into_iter())
        .collect();
    let mut statements = Vec::new();
    let mut left = rows;
    while left > 0 {
        let take = left.min(per_statement);
        left -= take;
        let mut qb = QueryBuilder::new(before);
        for row in 0..take {
            if row > 0 {
                qb.push(", ");
            }
            qb.push("(");
            for (i, column) in values.iter_mut().enumerate() {
                if i > 0 {
                    qb.push(", ");
                }
                match column.next() {
                    Some(Value::Text(v)) => qb.push_bind(v),
                    Some(Value::NullableText(v)) => qb.push_bind(v),
                    Some(Value::BigInt(v)) => qb.push_bind(v),
                    Some(Value::Int(v)) => qb.push_bind(v),
                    Some(Value::Bool(v)) => qb.push_bind(v),
                    Some(Value::Bytes(v)) => qb.push_bind(v),
                    Some(Value::NullableBytes(v)) => qb.push_bind(v),
                    None => qb.push("NULL"),
                };
            }
            qb.push(")");
        }
        qb.push(after);
        statements.push(qb);
    }
    statements
}

impl BatchSql for sqlx::Postgres {
    const PREPARED: bool = true;
    const WHOLE: bool = true;

    fn insert(
        head: &'static str,
        columns: Vec<Column<'_>>,
        tail: &'static str,
    ) -> Vec<QueryBuilder<Self>> {
        Self::insert_all(vec![Insert {
            head,
            columns,
            tail,
        }])
    }

    fn insert_all(inserts: Vec<Insert<'_>>) -> Vec<QueryBuilder<Self>> {
        let mut inserts: Vec<Insert<'_>> = inserts.into_iter().filter(|i| !i.is_empty()).collect();
        let Some(last) = inserts.pop() else {
            return Vec::new();
        };
        let mut qb = sized_builder("", inserts.iter().chain([&last]), 0);
        for (i, insert) in inserts.into_iter().enumerate() {
            qb.push(if i == 0 { "WITH " } else { ", " });
            qb.push(format_args!("w{i} AS ("));
            push_unnest_insert(&mut qb, insert);
            qb.push(") ");
        }
        push_unnest_insert(&mut qb, last);
        vec![qb]
    }

    fn insert_whole_locking(
        locked: Option<Locked<'_>>,
        inserts: Vec<Insert<'_>>,
        feed: Insert<'_>,
    ) -> Option<QueryBuilder<Self>> {
        let inserts: Vec<Insert<'_>> = inserts.into_iter().filter(|i| !i.is_empty()).collect();
        let feed = (!feed.is_empty()).then_some(feed);
        if inserts.is_empty() && feed.is_none() {
            return None;
        }
        let locked_bytes = locked.as_ref().map_or(0, |l| {
            l.head.len() + l.tail.len() + l.values.iter().map(|v| 4 + v.len()).sum::<usize>()
        });
        // Besides the inserts: the lock, and the closing check with its counts.
        let extra = locked_bytes + 128 + 64 * (inserts.len() + 1);
        let mut qb = sized_builder("WITH ", inserts.iter().chain(feed.as_ref()), extra);
        if let Some(locked) = locked {
            qb.push(locked.name).push(" AS (");
            push_select_each(&mut qb, locked.head, locked.values, locked.tail);
            qb.push("), ");
        }
        let mut rows = Vec::with_capacity(inserts.len() + 1);
        let events = feed.as_ref().map(|f| rows_of(&f.columns));
        for (i, insert) in inserts.into_iter().enumerate() {
            if i > 0 {
                qb.push(", ");
            }
            rows.push(i64::try_from(rows_of(&insert.columns)).unwrap_or(i64::MAX));
            qb.push(format_args!("w{i} AS ("));
            push_unnest_insert(&mut qb, insert);
            qb.push(" RETURNING 1)");
        }
        if let (Some(feed), Some(n)) = (feed, events) {
            // Each event's sequence is taken as its row is inserted, and every row comes
            // through the join with the lock: the lock is held first, until the commit.
            let i = rows.len();
            rows.push(i64::try_from(n).unwrap_or(i64::MAX));
            if i > 0 {
                qb.push(", ");
            }
            qb.push(format_args!("w{i} AS ("))
                .push(feed.head)
                .push(" SELECT u.* FROM (SELECT pg_advisory_xact_lock(")
                .push_bind(FEED_LOCK)
                .push(")) AS feed_lock, ");
            push_unnest(&mut qb, feed.columns);
            qb.push(" AS u").push(feed.tail).push(" RETURNING 1)");
        }
        // The check is a function (migration 0003) so that a shortfall fails the statement,
        // and with it every insert of the statement.
        qb.push(" SELECT batch_written_whole(");
        for (i, n) in rows.into_iter().enumerate() {
            if i > 0 {
                qb.push(" AND ");
            }
            qb.push(format_args!("(SELECT count(*) FROM w{i}) = "))
                .push_bind(n);
        }
        qb.push(")");
        if events.is_some() {
            qb.push(", pg_notify(")
                .push_bind(FEED_CHANNEL)
                .push(", '')");
        }
        Some(qb)
    }

    fn insert_and_lookup(
        insert: Insert<'_>,
        returning: &str,
        lookup: Lookup<'_>,
    ) -> Vec<QueryBuilder<Self>> {
        if insert.is_empty() && lookup.values.is_empty() {
            return Vec::new();
        }
        // The lookup joins each value to at most one row through the key's index: a plan of
        // that shape stays right however large the table grows after it was prepared.
        let mut qb = QueryBuilder::new("WITH inserted AS (");
        push_unnest_insert(&mut qb, insert);
        qb.push(format_args!(
            " RETURNING {returning} AS a) \
             SELECT 'inserted' AS part, a, NULL::text AS b FROM inserted \
             UNION ALL SELECT 'found', k.v, m.b FROM unnest("
        ))
        .push_bind(lookup.values)
        .push(format_args!(
            "::text[]) AS k(v) CROSS JOIN LATERAL \
             (SELECT {value} AS b FROM {table} WHERE {key} = k.v LIMIT 1) AS m",
            value = lookup.value,
            table = lookup.table,
            key = lookup.key,
        ));
        vec![qb]
    }

    fn table(head: &str, columns: Vec<Column<'_>>, tail: &str) -> Vec<QueryBuilder<Self>> {
        if rows_of(&columns) == 0 {
            return Vec::new();
        }
        let width = columns.len();
        let mut qb = QueryBuilder::new(head);
        push_unnest(&mut qb, columns);
        qb.push(" AS v(");
        for i in 1..=width {
            if i > 1 {
                qb.push(", ");
            }
            qb.push(format_args!("column{i}"));
        }
        qb.push(")").push(tail);
        vec![qb]
    }

    fn matching(head: &str, values: Vec<String>, tail: &str) -> Vec<QueryBuilder<Self>> {
        if values.is_empty() {
            return Vec::new();
        }
        // A semi-join on the unnested array, not `= ANY($1)`: with hundreds of values the
        // planner prices `= ANY` by the array's length and, on a table not yet analysed (a
        // fresh one being bulk-loaded), picks a sequential scan for every batch.
        let mut qb = QueryBuilder::new(head);
        qb.push(" IN (SELECT unnest(")
            .push_bind(values)
            .push("::text[]))")
            .push(tail);
        vec![qb]
    }

    fn select_each(head: &str, values: Vec<String>, tail: &str) -> Vec<QueryBuilder<Self>> {
        if values.is_empty() {
            return Vec::new();
        }
        let mut qb = QueryBuilder::new("");
        push_select_each(&mut qb, head, values, tail);
        vec![qb]
    }
}

/// Appends the select of [`BatchSql::select_each`] to `qb`.
fn push_select_each(
    qb: &mut QueryBuilder<sqlx::Postgres>,
    head: &str,
    values: Vec<String>,
    tail: &str,
) {
    qb.push("SELECT m.* FROM unnest(")
        .push_bind(values)
        .push("::text[]) AS k(v) CROSS JOIN LATERAL (")
        .push(head)
        .push(" = k.v")
        .push(tail)
        .push(") AS m");
}

impl BatchSql for sqlx::Sqlite {
    const PREPARED: bool = false;
    const WHOLE: bool = false;

    fn insert_whole_locking(
        _: Option<Locked<'_>>,
        _: Vec<Insert<'_>>,
        _: Insert<'_>,
    ) -> Option<QueryBuilder<Self>> {
        None
    }

    fn insert_all(inserts: Vec<Insert<'_>>) -> Vec<QueryBuilder<Self>> {
        inserts
            .into_iter()
            .flat_map(|i| Self::insert(i.head, i.columns, i.tail))
            .collect()
    }

    fn select_each(head: &str, values: Vec<String>, tail: &str) -> Vec<QueryBuilder<Self>> {
        Self::matching(head, values, tail)
    }

    fn insert_and_lookup(
        insert: Insert<'_>,
        returning: &str,
        lookup: Lookup<'_>,
    ) -> Vec<QueryBuilder<Self>> {
        let tail = format!(
            "{} RETURNING 'inserted' AS part, {returning} AS a, NULL AS b",
            insert.tail
        );
        let mut statements =
            sqlite_values(&format!("{} VALUES ", insert.head), insert.columns, &tail);
        statements.extend(Self::matching(
            &format!(
                "SELECT 'found' AS part, {key} AS a, {value} AS b FROM {table} WHERE {key}",
                key = lookup.key,
                value = lookup.value,
                table = lookup.table,
            ),
            lookup.values,
            "",
        ));
        statements
    }

    fn insert(
        head: &'static str,
        columns: Vec<Column<'_>>,
        tail: &'static str,
    ) -> Vec<QueryBuilder<Self>> {
        sqlite_values(&format!("{head} VALUES "), columns, tail)
    }

    fn table(head: &str, columns: Vec<Column<'_>>, tail: &str) -> Vec<QueryBuilder<Self>> {
        sqlite_values(
            &format!("{head}(VALUES "),
            columns,
            &format!(") AS v{tail}"),
        )
    }

    fn matching(head: &str, values: Vec<String>, tail: &str) -> Vec<QueryBuilder<Self>> {
        values
            .chunks(SQLITE_MAX_BINDS)
            .map(|piece| {
                let mut qb = QueryBuilder::new(head);
                qb.push(" IN (");
                let mut list = qb.separated(", ");
                for v in piece {
                    list.push_bind(v.clone());
                }
                list.push_unseparated(")");
                qb.push(tail);
                qb
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What binding `column` as an array writes to the bind buffer: its length, then sqlx's
    /// array encoding.
    fn bound_size(column: &Column<'_>) -> usize {
        use sqlx::Encode as _;
        let mut buf = sqlx::postgres::PgArgumentBuffer::default();
        let _ = match column {
            Column::Text(v) => v.encode_by_ref(&mut buf),
            Column::NullableText(v) => v.encode_by_ref(&mut buf),
            Column::BigInt(v) => v.encode_by_ref(&mut buf),
            Column::Int(v) => v.encode_by_ref(&mut buf),
            Column::Bool(v) => v.encode_by_ref(&mut buf),
            Column::Bytes(v) => v.encode_by_ref(&mut buf),
            Column::NullableBytes(v) => v.encode_by_ref(&mut buf),
        }
        .expect("an array encodes");
        4 + buf.len()
    }

    #[test]
    fn an_insert_made_owned_keeps_its_values_and_borrows_nothing() {
        let rows = [String::from("a"), String::from("파트너")];
        let insert = Insert {
            head: "INSERT INTO t (a, b, c)",
            columns: vec![
                Column::Text(rows.iter().map(|r| Cow::Borrowed(r.as_str())).collect()),
                Column::NullableText(vec![Some(Cow::Borrowed(rows[0].as_str())), None]),
                Column::BigInt(vec![1, 2]),
            ],
            tail: " ON CONFLICT DO NOTHING",
        };
        let owned: Insert<'static> = insert.into_owned();
        drop(rows);
        assert_eq!(
            (owned.head, owned.tail),
            ("INSERT INTO t (a, b, c)", " ON CONFLICT DO NOTHING")
        );
        match &owned.columns[..] {
            [Column::Text(t), Column::NullableText(n), Column::BigInt(b)] => {
                assert_eq!(t, &["a", "파트너"]);
                assert!(t.iter().all(|v| matches!(v, Cow::Owned(_))));
                assert_eq!(n, &[Some(Cow::Borrowed("a")), None]);
                assert!(matches!(n[0], Some(Cow::Owned(_))));
                assert_eq!(b, &[1, 2]);
            }
            other => panic!("columns changed: {other:?}"),
        }
    }

    #[test]
    fn a_columns_bound_size_is_what_binding_it_writes() {
        let columns = [
            Column::Text(vec!["".into(), "파트너".into(), "x".repeat(300).into()]),
            Column::NullableText(vec![Some("a".into()), None, Some("bc".into())]),
            Column::BigInt(vec![1, i64::MAX, -3]),
            Column::Int(vec![7; 5]),
            Column::Bool(vec![true, false]),
            Column::Bytes(vec![vec![0; 48], vec![]]),
            Column::NullableBytes(vec![None, Some(vec![1, 2, 3])]),
        ];
        for column in &columns {
            assert_eq!(column.pg_bound_size(), bound_size(column), "{column:?}");
        }
    }

    #[test]
    fn postgres_statement_text_does_not_depend_on_the_number_of_rows() {
        let sql = |n: usize| {
            let mut qb = <sqlx::Postgres as BatchSql>::insert(
                "INSERT INTO t (a, b)",
                vec![
                    Column::Text(vec!["x".into(); n]),
                    Column::BigInt(vec![1; n]),
                ],
                " RETURNING a",
            );
            assert_eq!(qb.len(), 1);
            qb.remove(0).into_string()
        };
        assert_eq!(sql(1), sql(500));
        assert_eq!(
            sql(3),
            "INSERT INTO t (a, b) SELECT * FROM UNNEST($1::text[], $2::int8[]) RETURNING a"
        );
    }

    #[test]
    fn sqlite_cuts_rows_under_the_bind_limit() {
        let rows = SQLITE_MAX_BINDS; // two columns: two statements.
        let statements = <sqlx::Sqlite as BatchSql>::insert(
            "INSERT INTO t (a, b)",
            vec![
                Column::Text(vec!["x".into(); rows]),
                Column::NullableText(vec![None; rows]),
            ],
            "",
        );
        assert_eq!(statements.len(), 2);
        let binds: usize = statements
            .iter()
            .map(|qb| qb.sql().as_str().matches('?').count())
            .sum();
        assert_eq!(binds, rows * 2);
    }

    #[test]
    fn postgres_joins_inserts_into_one_statement_and_sqlite_keeps_them_apart() {
        let inserts = || {
            vec![
                Insert {
                    head: "INSERT INTO a (x)",
                    columns: vec![Column::Text(vec!["x".into(); 3])],
                    tail: "",
                },
                Insert {
                    head: "INSERT INTO b (y)",
                    columns: vec![Column::BigInt(vec![])],
                    tail: "",
                },
                Insert {
                    head: "INSERT INTO c (z)",
                    columns: vec![Column::Int(vec![1; 2])],
                    tail: " ON CONFLICT DO NOTHING",
                },
            ]
        };
        let pg = <sqlx::Postgres as BatchSql>::insert_all(inserts());
        assert_eq!(pg.len(), 1);
        assert_eq!(
            pg[0].sql().as_str(),
            "WITH w0 AS (INSERT INTO a (x) SELECT * FROM UNNEST($1::text[])) \
             INSERT INTO c (z) SELECT * FROM UNNEST($2::int4[]) ON CONFLICT DO NOTHING"
        );
        let sqlite = <sqlx::Sqlite as BatchSql>::insert_all(inserts());
        assert_eq!(sqlite.len(), 2, "the insert with no rows is left out");
    }

    #[test]
    fn postgres_whole_insert_checks_every_count() {
        let inserts = || {
            vec![
                Insert {
                    head: "INSERT INTO a (x)",
                    columns: vec![Column::Text(vec!["x".into(); 3])],
                    tail: " ON CONFLICT DO NOTHING",
                },
                Insert {
                    head: "INSERT INTO b (y)",
                    columns: vec![Column::BigInt(vec![7])],
                    tail: "",
                },
            ]
        };
        let no_events = || Insert {
            head: "INSERT INTO change_events (e)",
            columns: vec![Column::Text(Vec::new())],
            tail: "",
        };
        let qb = <sqlx::Postgres as BatchSql>::insert_whole(inserts(), no_events())
            .expect("PostgreSQL writes a batch whole");
        assert_eq!(
            qb.sql().as_str(),
            "WITH w0 AS (INSERT INTO a (x) SELECT * FROM UNNEST($1::text[]) ON CONFLICT DO NOTHING \
             RETURNING 1), w1 AS (INSERT INTO b (y) SELECT * FROM UNNEST($2::int8[]) RETURNING 1) \
             SELECT batch_written_whole((SELECT count(*) FROM w0) = $3 AND \
             (SELECT count(*) FROM w1) = $4)"
        );
        assert!(<sqlx::Sqlite as BatchSql>::insert_whole(inserts(), no_events()).is_none());
        // WHOLE tells callers, before they build the rows, what insert_whole would answer.
        assert_eq!(
            <sqlx::Postgres as BatchSql>::insert_whole(inserts(), no_events()).is_some(),
            <sqlx::Postgres as BatchSql>::WHOLE
        );
        assert_eq!(
            <sqlx::Sqlite as BatchSql>::insert_whole(inserts(), no_events()).is_some(),
            <sqlx::Sqlite as BatchSql>::WHOLE
        );
    }

    #[test]
    fn postgres_whole_insert_takes_the_feed_lock_before_any_event_and_notifies() {
        let qb = <sqlx::Postgres as BatchSql>::insert_whole(
            vec![Insert {
                head: "INSERT INTO a (x)",
                columns: vec![Column::Text(vec!["x".into(); 2])],
                tail: "",
            }],
            Insert {
                head: "INSERT INTO change_events (e)",
                columns: vec![Column::Text(vec!["e".into(); 2])],
                tail: "",
            },
        )
        .expect("PostgreSQL writes a batch whole");
        assert_eq!(
            qb.sql().as_str(),
            "WITH w0 AS (INSERT INTO a (x) SELECT * FROM UNNEST($1::text[]) RETURNING 1), \
             w1 AS (INSERT INTO change_events (e) SELECT u.* FROM \
             (SELECT pg_advisory_xact_lock($2)) AS feed_lock, UNNEST($3::text[]) AS u \
             RETURNING 1) \
             SELECT batch_written_whole((SELECT count(*) FROM w0) = $4 AND \
             (SELECT count(*) FROM w1) = $5), pg_notify($6, '')"
        );
        let events_alone = <sqlx::Postgres as BatchSql>::insert_whole(
            Vec::new(),
            Insert {
                head: "INSERT INTO change_events (e)",
                columns: vec![Column::Text(vec!["e".into()])],
                tail: "",
            },
        )
        .expect("the events of a transaction are a statement of their own");
        assert_eq!(
            events_alone.sql().as_str(),
            "WITH w0 AS (INSERT INTO change_events (e) SELECT u.* FROM \
             (SELECT pg_advisory_xact_lock($1)) AS feed_lock, UNNEST($2::text[]) AS u \
             RETURNING 1) \
             SELECT batch_written_whole((SELECT count(*) FROM w0) = $3), pg_notify($4, '')"
        );
    }

    #[test]
    fn postgres_whole_insert_locks_first_and_its_inserts_join_the_locked_rows() {
        let locked = Locked {
            name: "payees",
            head: "SELECT id, bank FROM p WHERE id",
            values: vec!["a".into(), "b".into()],
            tail: " FOR UPDATE",
        };
        let insert = Insert {
            head: "INSERT INTO d (id, x, bank)",
            columns: vec![
                Column::Text(vec!["a".into(), "b".into()]),
                Column::BigInt(vec![1, 2]),
            ],
            tail: " AS u(id) JOIN payees USING (id)",
        };
        let no_events = Insert {
            head: "INSERT INTO change_events (e)",
            columns: vec![Column::Text(Vec::new())],
            tail: "",
        };
        let qb = <sqlx::Postgres as BatchSql>::insert_whole_locking(
            Some(locked),
            vec![insert],
            no_events,
        )
        .expect("PostgreSQL writes a batch whole");
        assert_eq!(
            qb.sql().as_str(),
            "WITH payees AS (SELECT m.* FROM unnest($1::text[]) AS k(v) CROSS JOIN LATERAL \
             (SELECT id, bank FROM p WHERE id = k.v FOR UPDATE) AS m), \
             w0 AS (INSERT INTO d (id, x, bank) SELECT * FROM UNNEST($2::text[], $3::int8[]) \
             AS u(id) JOIN payees USING (id) RETURNING 1) \
             SELECT batch_written_whole((SELECT count(*) FROM w0) = $4)"
        );
    }

    #[test]
    fn a_batch_joins_as_a_table_of_numbered_columns() {
        let columns = |n: usize| {
            vec![
                Column::Text(vec!["x".into(); n]),
                Column::BigInt(vec![1; n]),
            ]
        };
        let head = "UPDATE t SET b = v.column2 FROM ";
        let tail = " WHERE t.a = v.column1";
        let pg = |n: usize| {
            let mut qb = <sqlx::Postgres as BatchSql>::table(head, columns(n), tail);
            assert_eq!(qb.len(), 1);
            qb.remove(0).into_string()
        };
        assert_eq!(pg(1), pg(500));
        assert_eq!(
            pg(2),
            "UPDATE t SET b = v.column2 FROM UNNEST($1::text[], $2::int8[]) AS v(column1, column2) \
             WHERE t.a = v.column1"
        );
        let sqlite = <sqlx::Sqlite as BatchSql>::table(head, columns(2), tail);
        assert_eq!(sqlite.len(), 1);
        assert_eq!(
            sqlite[0].sql().as_str(),
            "UPDATE t SET b = v.column2 FROM (VALUES (?, ?), (?, ?)) AS v WHERE t.a = v.column1"
        );
        let rows = SQLITE_MAX_BINDS; // two columns: two statements.
        assert_eq!(
            <sqlx::Sqlite as BatchSql>::table(head, columns(rows), tail).len(),
            2
        );
    }

    #[test]
    fn no_rows_no_statement() {
        assert!(<sqlx::Postgres as BatchSql>::table("S", vec![Column::Int(vec![])], "").is_empty());
        assert!(<sqlx::Sqlite as BatchSql>::table("S", vec![Column::Int(vec![])], "").is_empty());
        assert!(<sqlx::Sqlite as BatchSql>::insert("I", vec![Column::Int(vec![])], "").is_empty());
        assert!(<sqlx::Postgres as BatchSql>::matching("S", vec![], "").is_empty());
        assert!(<sqlx::Sqlite as BatchSql>::matching("S", vec![], "").is_empty());
        assert!(<sqlx::Postgres as BatchSql>::select_each("S", vec![], "").is_empty());
        assert!(<sqlx::Sqlite as BatchSql>::select_each("S", vec![], "").is_empty());
    }

    #[test]
    fn postgres_looks_up_each_value_through_the_index_in_the_given_order() {
        let qb = <sqlx::Postgres as BatchSql>::select_each(
            "SELECT a FROM t WHERE b",
            vec!["x".into(), "y".into()],
            " FOR UPDATE",
        );
        assert_eq!(qb.len(), 1);
        assert_eq!(
            qb[0].sql().as_str(),
            "SELECT m.* FROM unnest($1::text[]) AS k(v) CROSS JOIN LATERAL \
             (SELECT a FROM t WHERE b = k.v FOR UPDATE) AS m"
        );
    }
}
