//! Multi-row statements in each database's best form. On PostgreSQL a batch is one statement
//! whose columns are bound as arrays (`UNNEST`): its text never changes with the
//! number of rows, so the server parses and plans it once per connection, and a batch of any
//! size costs a handful of bind parameters. On SQLite it is a multi-row `VALUES` (or `IN`)
//! list, cut into pieces under the bind-parameter limit.

use sqlx::QueryBuilder;

/// Bind parameters per statement at most: SQLite's default limit (32766).
const SQLITE_MAX_BINDS: usize = 32_766;

/// One column of a batch of rows; every column of a batch has one value per row.
#[derive(Debug, Clone)]
pub enum Column {
    Text(Vec<String>),
    NullableText(Vec<Option<String>>),
    BigInt(Vec<i64>),
    Int(Vec<i32>),
    Bytes(Vec<Vec<u8>>),
    NullableBytes(Vec<Option<Vec<u8>>>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Self::Text(v) => v.len(),
            Self::NullableText(v) => v.len(),
            Self::BigInt(v) => v.len(),
            Self::Int(v) => v.len(),
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
            Self::Bytes(_) | Self::NullableBytes(_) => "bytea[]",
        }
    }

    fn into_values(self) -> Vec<Value> {
        match self {
            Self::Text(v) => v.into_iter().map(Value::Text).collect(),
            Self::NullableText(v) => v.into_iter().map(Value::NullableText).collect(),
            Self::BigInt(v) => v.into_iter().map(Value::BigInt).collect(),
            Self::Int(v) => v.into_iter().map(Value::Int).collect(),
            Self::Bytes(v) => v.into_iter().map(Value::Bytes).collect(),
            Self::NullableBytes(v) => v.into_iter().map(Value::NullableBytes).collect(),
        }
    }
}

/// One value of a [`Column`], for databases that bind row by row.
enum Value {
    Text(String),
    NullableText(Option<String>),
    BigInt(i64),
    Int(i32),
    Bytes(Vec<u8>),
    NullableBytes(Option<Vec<u8>>),
}

/// The statements a batch of rows takes on one database.
pub trait BatchSql: sqlx::Database + Sized {
    /// Whether the statements' text is fixed, so the database may keep them prepared.
    const PREPARED: bool;

    /// Inserts the rows `columns` hold. `head` names the table and columns
    /// (`INSERT INTO t (a, b)`); `tail` follows the rows (`ON CONFLICT .. RETURNING ..`).
    /// Returns no statement for no rows.
    fn insert(head: &str, columns: Vec<Column>, tail: &str) -> Vec<QueryBuilder<Self>>;

    /// Selects rows whose column is one of `values`: `head` ends with the column
    /// (`SELECT a FROM t WHERE b`), `tail` follows the condition. No statement for no values.
    fn matching(head: &str, values: Vec<String>, tail: &str) -> Vec<QueryBuilder<Self>>;
}

fn rows_of(columns: &[Column]) -> usize {
    let rows = columns.first().map_or(0, Column::len);
    debug_assert!(columns.iter().all(|c| c.len() == rows), "ragged batch");
    rows
}

impl BatchSql for sqlx::Postgres {
    const PREPARED: bool = true;

    fn insert(head: &str, columns: Vec<Column>, tail: &str) -> Vec<QueryBuilder<Self>> {
        if rows_of(&columns) == 0 {
            return Vec::new();
        }
        let mut qb = QueryBuilder::new(head);
        qb.push(" SELECT * FROM UNNEST(");
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
                Column::Bytes(v) => qb.push_bind(v),
                Column::NullableBytes(v) => qb.push_bind(v),
            };
            qb.push("::").push(array);
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
}

impl BatchSql for sqlx::Sqlite {
    const PREPARED: bool = false;

    fn insert(head: &str, columns: Vec<Column>, tail: &str) -> Vec<QueryBuilder<Self>> {
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
            let mut qb = QueryBuilder::new(head);
            qb.push(" VALUES ");
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
                        Some(Value::Bytes(v)) => qb.push_bind(v),
                        Some(Value::NullableBytes(v)) => qb.push_bind(v),
                        None => qb.push("NULL"),
                    };
                }
                qb.push(")");
            }
            qb.push(tail);
            statements.push(qb);
        }
        statements
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
    fn no_rows_no_statement() {
        assert!(<sqlx::Sqlite as BatchSql>::insert("I", vec![Column::Int(vec![])], "").is_empty());
        assert!(<sqlx::Postgres as BatchSql>::matching("S", vec![], "").is_empty());
        assert!(<sqlx::Sqlite as BatchSql>::matching("S", vec![], "").is_empty());
    }
}
