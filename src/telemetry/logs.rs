//! JSON logs: one object per line, and every line logged inside a span carries the trace's
//! `trace_id` and the span's `span_id` at the top level, where a log pipeline finds them to
//! link a line to its trace.

use std::fmt::{self, Write as _};

use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::field::{RecordFields, VisitOutput as _};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The JSON log layer, writing to `writer`.
pub(super) fn json_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(JsonLine)
        .with_writer(writer)
}

/// The text log layer, writing to `writer`: the default format, each line logged inside a
/// span starting with its trace's `trace_id`.
pub(super) fn text_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(TextFields)
        .event_format(TextLine(tracing_subscriber::fmt::format()))
        .with_writer(writer)
        // Colours only for a person at a terminal: a log file or collector gets plain
        // text, and no call pays for escape codes nobody sees.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
}

/// The fields of a span or line in the text format, exactly as [`DefaultFields`] writes them,
/// without its costs where they buy nothing. A span's fields are written when the span is
/// made, whether or not a line is ever logged in it, so every call pays for its SERVER span's:
/// the default writes each value through `{:?}` one character at a time, and each name
/// through a colour style even when there are no colours. Here, without colours, a name is
/// written as it is, a number as a number, and text that `{:?}` would leave as it is (printable
/// ASCII but for `"` and `\`) between quotes as it is. Everything else, and everything when
/// there are colours, goes to [`DefaultFields`]' own visitor.
pub(super) struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut visitor = TextVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
            pending: ShortLine::default(),
        };
        fields.record(&mut visitor);
        let flushed = visitor.flush();
        visitor.result.and(flushed)
    }
}

/// [`TextFields`]' visitor, for a writer without colours. Plain fields are put together on
/// the stack and written at once: each write goes through the writer's `dyn Write`, and into
/// a string that grows as it is written, so a span's fields written one piece at a time
/// cost a dozen calls and several reallocations.
struct TextVisitor<'w> {
    writer: Writer<'w>,
    /// Whether no field has been written yet (the next one takes no leading space).
    is_empty: bool,
    result: fmt::Result,
    /// What is yet to be written, in order before anything written directly.
    pending: ShortLine,
}

impl TextVisitor<'_> {
    /// Whether the field is written `name=value` with its name as it is: not the message
    /// (written bare, its escape codes guarded), nor a raw identifier (`r#type`, written
    /// `type`), nor the `log` crate's metadata (not written).
    fn plain_name(field: &Field) -> bool {
        let name = field.name();
        name != "message" && !name.starts_with("r#") && !name.starts_with("log.")
    }

    /// Writes what is pending.
    fn flush(&mut self) -> fmt::Result {
        if self.pending.len == 0 {
            return Ok(());
        }
        let written = match self.pending.as_str() {
            Some(text) => self.writer.write_str(text),
            None => Err(fmt::Error),
        };
        self.pending.len = 0;
        written
    }

    /// The space that separates this field from the one before, if there was one.
    fn separator(&mut self) -> &'static str {
        if std::mem::replace(&mut self.is_empty, false) {
            ""
        } else {
            " "
        }
    }

    /// Writes `name="value"`, for a `value` that `{:?}` leaves as it is.
    fn quoted(&mut self, field: &Field, value: &str) -> fmt::Result {
        let pieces = [self.separator(), field.name(), "=\"", value, "\""];
        if self.pending.push_all(&pieces) {
            return Ok(());
        }
        self.flush()?;
        if self.pending.push_all(&pieces) {
            return Ok(());
        }
        pieces
            .iter()
            .try_for_each(|piece| self.writer.write_str(piece))
    }

    /// Writes `name=value` for a number or a boolean, whose `{:?}` is its `{}`.
    fn displayed(&mut self, field: &Field, value: impl fmt::Display) -> fmt::Result {
        let (separator, name) = (self.separator(), field.name());
        let mark = self.pending.len;
        if self.pending.push_all(&[separator, name, "="]) && write!(self.pending, "{value}").is_ok()
        {
            return Ok(());
        }
        self.pending.len = mark;
        self.flush()?;
        write!(self.writer, "{separator}{name}={value}")
    }

    /// The field as the default visitor writes it, after what is pending.
    fn default(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if let Err(e) = self.flush() {
            self.result = Err(e);
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        // It writes every field but the `log` crate's metadata.
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }
}

/// Text put together on the stack, up to [`ShortLine::CAPACITY`] bytes.
struct ShortLine {
    bytes: [u8; ShortLine::CAPACITY],
    len: usize,
}

impl Default for ShortLine {
    fn default() -> Self {
        ShortLine {
            bytes: [0; ShortLine::CAPACITY],
            len: 0,
        }
    }
}

impl ShortLine {
    /// Room for a SERVER span's fields (about 250 bytes).
    const CAPACITY: usize = 512;

    /// Appends every piece; false, with nothing appended, if they do not all fit.
    fn push_all(&mut self, pieces: &[&str]) -> bool {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        if self.len + total > Self::CAPACITY {
            return false;
        }
        for piece in pieces {
            let end = self.len + piece.len();
            self.bytes[self.len..end].copy_from_slice(piece.as_bytes());
            self.len = end;
        }
        true
    }

    /// What was appended: whole strings, so always text.
    fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes[..self.len]).ok()
    }
}

impl fmt::Write for ShortLine {
    /// Fails, with nothing appended, when `s` does not fit.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.push_all(&[s]) {
            Ok(())
        } else {
            Err(fmt::Error)
        }
    }
}

/// Whether `{:?}` writes `s` between quotes as it is.
fn debug_is_verbatim(s: &str) -> bool {
    s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if Self::plain_name(field) && debug_is_verbatim(value) {
            self.result = self.quoted(field, value);
        } else {
            self.default(field, |v| v.record_str(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_display(field, value, |v| v.record_i64(field, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_display(field, value, |v| v.record_u64(field, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record_display(field, value, |v| v.record_bool(field, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.default(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        if Self::plain_name(field) {
            self.result = self.flush().and_then(|()| {
                let separator = self.separator();
                write!(self.writer, "{separator}{}={value:?}", field.name())
            });
        } else {
            self.default(field, |v| v.record_debug(field, value));
        }
    }
}

impl TextVisitor<'_> {
    /// A number or a boolean, whose `{:?}` is its `{}`.
    fn record_display(
        &mut self,
        field: &Field,
        value: impl fmt::Display,
        default: impl FnOnce(&mut DefaultVisitor<'_>),
    ) {
        if self.result.is_err() {
            return;
        }
        if Self::plain_name(field) {
            self.result = self.displayed(field, value);
        } else {
            self.default(field, default);
        }
    }
}

/// A line in the default text format, led by `trace_id=…` inside a span. The id is read from
/// the span's OpenTelemetry context when a line is logged, not kept on every span.
struct TextLine(tracing_subscriber::fmt::format::Format);

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some((trace_id, _)) = trace_of(ctx) {
            write!(writer, "trace_id={trace_id} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// The trace and span ids of the span an event is logged in, if it has a valid context.
fn trace_of<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let id = ctx.event_scope()?.next()?.id();
    let cx = tracing::dispatcher::get_default(|dispatch| {
        tracing_opentelemetry::get_otel_context(&id, dispatch)
    })?;
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

/// `{"timestamp", "level", "target", "fields": {...}, "span": {"name", ...its fields},
/// "trace_id", "span_id"}`; the last three only inside a span.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            jiff::Timestamp::now().to_string().into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        line.insert("fields".into(), Value::Object(fields));
        if let Some(span) = ctx.event_scope().and_then(|mut scope| scope.next()) {
            let mut described = Map::new();
            described.insert("name".into(), span.name().into());
            if let Some(formatted) = span.extensions().get::<FormattedFields<N>>()
                && let Ok(Value::Object(span_fields)) = serde_json::from_str(&formatted.fields)
            {
                described.extend(span_fields);
            }
            line.insert("span".into(), Value::Object(described));
        }
        // The span's extensions are no longer borrowed: the OpenTelemetry layer takes them.
        if let Some((trace_id, span_id)) = trace_of(ctx) {
            line.insert("trace_id".into(), trace_id.into());
            line.insert("span_id".into(), span_id.into());
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use proptest::prelude::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Where a layer's lines go, to be read back.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        fn text(&self) -> String {
            let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    /// What `log` logs in the text format without colours: through the default field
    /// formatter, and through [`TextFields`].
    fn both(log: impl FnOnce()) -> (String, String) {
        let (default, ours) = (Lines::default(), Lines::default());
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .without_time()
                    .with_writer(default.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(TextFields)
                    .with_ansi(false)
                    .without_time()
                    .with_writer(ours.clone()),
            );
        tracing::subscriber::with_default(subscriber, log);
        (default.text(), ours.text())
    }

    #[derive(Debug)]
    struct Failed(Option<io::Error>);

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the write failed")
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.0.as_ref().map(|e| e as _)
        }
    }

    #[test]
    fn text_fields_are_written_as_the_default_writes_them() {
        let (default, ours) = both(|| {
            let peer: std::net::IpAddr = "127.0.0.1"
                .parse()
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            let span = tracing::info_span!(
                "rpc",
                otel.name = "payouts.v1.PartnerService/RegisterPartner",
                plain = "a b-c_d.e:f/g",
                long = "abcdefghij".repeat(20).as_str(),
                quoted = "say \"hi\"",
                backslash = "a\\b",
                newline = "one\ntwo",
                tab = "a\tb",
                escape = "\u{1b}[31mred",
                korean = "카카오",
                empty = "",
                negative = -42_i64,
                unsigned = 7_u64,
                yes = true,
                no = false,
                shown = tracing::field::display(peer),
                debugged = ?vec!["x", "y\"z"],
                r#type = "raw",
                later = tracing::field::Empty,
                absent = tracing::field::Empty,
            );
            let _entered = span.enter();
            span.record("later", "set afterwards");
            tracing::info!(count = 3_i64, text = "line \"one\"", "logged in the span");
            let failed = Failed(Some(io::Error::other("disk full")));
            let error: &(dyn std::error::Error + 'static) = &failed;
            tracing::warn!(error, "with sources");
            let alone: &(dyn std::error::Error + 'static) = &Failed(None);
            tracing::warn!(error = alone, "without");
            tracing::info!("message \"quoted\" and \u{1b}[31m escaped");
        });
        assert!(default.contains("카카오"), "{default}");
        assert_eq!(default.lines().count(), 4, "{default}");
        assert_eq!(ours, default);
    }

    /// A number that fills the pending line up, to the byte and past it.
    #[test]
    fn a_number_at_the_end_of_the_pending_line_is_written_whole() {
        for fill in 480..512 {
            let text = "x".repeat(fill);
            let (default, ours) = both(|| {
                let span = tracing::info_span!("s", t = text.as_str(), m = u64::MAX, yes = true);
                let _entered = span.enter();
                tracing::info!("in the span");
            });
            assert_eq!(ours, default, "fill {fill}");
        }
    }

    proptest! {
        #[test]
        fn any_text_field_is_written_as_the_default_writes_it(
            a in any::<String>(),
            // Fields that fill the pending line (`ShortLine`) to any point, then overflow
            // it: with text, with a number, and after a field written the default way.
            b in "[ -~]{0,300}",
            n in any::<i64>(),
            c in "[ -~]{0,300}",
            m in any::<u64>(),
            d in "[ -~]{0,600}",
            yes: bool,
        ) {
            let (default, ours) = both(|| {
                let span = tracing::info_span!(
                    "s",
                    b = b.as_str(),
                    n,
                    c = c.as_str(),
                    a = a.as_str(),
                    m,
                    d = d.as_str(),
                    yes,
                    listed = ?[n],
                );
                let _entered = span.enter();
                tracing::info!(a = a.as_str(), "in the span");
            });
            prop_assert_eq!(ours, default);
        }
    }
}
